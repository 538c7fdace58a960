// Every role assignment of the stack, each at the narrowest scope the code's calls need.
// docs/azure.md has the same list as a table (call -> role -> scope); tests/unit/test_infra.py
// checks that every row of it is assigned here and that nothing here is missing from it.
param appPrincipalId string
param clusterPrincipalId string
param hostAccountName string
param dataAccountName string
param serviceBusNamespace string
param requestsQueue string
param eventsTopic string
param workspaceName string
param registryName string
param appInsightsName string

// Built-in role definition ids (the same in every tenant).
var roleIds = {
  'Storage Blob Data Owner': 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  'Storage Blob Data Contributor': 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  'Storage Blob Data Reader': '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1'
  'Storage Queue Data Contributor': '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  'Storage Table Data Contributor': '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  'Azure Service Bus Data Receiver': '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0'
  'Azure Service Bus Data Sender': '69a216fc-b8fb-44d8-bc22-1f3c2cd27a39'
  'AzureML Data Scientist': 'f6c7c914-8db3-469d-8ca1-694a8f32e121'
  AcrPull: '7f951dda-4ed3-4680-a7ca-43fe172d538d'
  'Monitoring Metrics Publisher': '3913510d-42f4-4e42-8a64-420c390055eb'
}

resource hostAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: hostAccountName
}

resource imagesContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  name: '${dataAccountName}/default/images'
}

resource artifactsContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  name: '${dataAccountName}/default/retrain'
}

resource ledgerTable 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' existing = {
  name: '${dataAccountName}/default/retrain'
}

resource requestsQueueRef 'Microsoft.ServiceBus/namespaces/queues@2021-11-01' existing = {
  name: '${serviceBusNamespace}/${requestsQueue}'
}

resource eventsTopicRef 'Microsoft.ServiceBus/namespaces/topics@2021-11-01' existing = {
  name: '${serviceBusNamespace}/${eventsTopic}'
}

resource workspace 'Microsoft.MachineLearningServices/workspaces@2024-04-01' existing = {
  name: workspaceName
}

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' existing = {
  name: registryName
}

resource insights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

// -- the Function App's identity ------------------------------------------------------------

// The Functions host: timer leases and its own bookkeeping (identity-based AzureWebJobsStorage), and the deployment package.
resource appHostBlobs 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: hostAccount
  name: guid(hostAccount.id, appPrincipalId, 'Storage Blob Data Owner')
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds['Storage Blob Data Owner'])
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
    description: 'app: Functions host storage (leases, deployment package)'
  }
}

resource appHostQueues 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: hostAccount
  name: guid(hostAccount.id, appPrincipalId, 'Storage Queue Data Contributor')
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds['Storage Queue Data Contributor'])
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
    description: 'app: Functions host storage (the runtime queues)'
  }
}

// Backfills list the images container; image events need no storage role.
resource appImagesRead 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: imagesContainer
  name: guid(imagesContainer.id, appPrincipalId, 'Storage Blob Data Reader')
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds['Storage Blob Data Reader'])
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
    description: 'app: list images for backfills'
  }
}

// Manifests, champion checkpoints, oversized events.
resource appArtifactsWrite 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: artifactsContainer
  name: guid(artifactsContainer.id, appPrincipalId, 'Storage Blob Data Contributor')
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds['Storage Blob Data Contributor'])
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
    description: 'app: write manifests, champion checkpoints, oversized events'
  }
}

// The ledger.
resource appLedger 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: ledgerTable
  name: guid(ledgerTable.id, appPrincipalId, 'Storage Table Data Contributor')
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds['Storage Table Data Contributor'])
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
    description: 'app: read and write the ledger table'
  }
}

resource appRequests 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: requestsQueueRef
  name: guid(requestsQueueRef.id, appPrincipalId, 'Azure Service Bus Data Receiver')
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds['Azure Service Bus Data Receiver'])
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
    description: 'app: receive retrain requests (queue trigger)'
  }
}

resource appEvents 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: eventsTopicRef
  name: guid(eventsTopicRef.id, appPrincipalId, 'Azure Service Bus Data Sender')
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds['Azure Service Bus Data Sender'])
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
    description: 'app: publish CloudEvents (outbox relay)'
  }
}

// Create jobs, read their status and outputs, register models and environments. It cannot create
// or delete compute: the cluster is created by this template, and the worker never creates it.
resource appWorkspace 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: workspace
  name: guid(workspace.id, appPrincipalId, 'AzureML Data Scientist')
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds['AzureML Data Scientist'])
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
    description: 'app: submit and cancel jobs, download outputs, register models and environments'
  }
}

resource appTelemetry 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: insights
  name: guid(insights.id, appPrincipalId, 'Monitoring Metrics Publisher')
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds['Monitoring Metrics Publisher'])
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
    description: 'app: send telemetry with Entra ID (local auth is off)'
  }
}

// -- the training cluster's identity --------------------------------------------------------

resource clusterImagesRead 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: imagesContainer
  name: guid(imagesContainer.id, clusterPrincipalId, 'Storage Blob Data Reader')
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds['Storage Blob Data Reader'])
    principalId: clusterPrincipalId
    principalType: 'ServicePrincipal'
    description: 'cluster: mount the images datastore'
  }
}

resource clusterArtifactsRead 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: artifactsContainer
  name: guid(artifactsContainer.id, clusterPrincipalId, 'Storage Blob Data Reader')
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds['Storage Blob Data Reader'])
    principalId: clusterPrincipalId
    principalType: 'ServicePrincipal'
    description: 'cluster: download the manifest and the champion checkpoint'
  }
}

resource clusterPull 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: registry
  name: guid(registry.id, clusterPrincipalId, 'AcrPull')
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.AcrPull)
    principalId: clusterPrincipalId
    principalType: 'ServicePrincipal'
    description: 'cluster: pull the training image'
  }
}

// retrain: the whole stack in one resource group (Azure Developer CLI template: see azure.yaml and docs/azure.md).
//
// Identity-based connections only: no storage key, connection string or SAS is read or stored;
// every service is reached with a user-assigned managed identity and a role at the narrowest
// scope its calls need (modules/roles.bicep; the table in docs/azure.md). The Event Grid
// subscriptions point at functions that exist only once the code is published, so they are a
// second deployment (events.bicep), run by azd's postdeploy hook.
targetScope = 'resourceGroup'

@minLength(1)
@maxLength(24)
@description('Name of the azd environment; resource names derive from it.')
param environmentName string

@description('Region for every resource.')
param location string = resourceGroup().location

@description('The model the stack is set up for: its images live under <model>/<label>/<file> in the images container.')
param modelName string = 'birds'

@description('GPU VM size of the training cluster.')
param gpuVmSize string = 'Standard_NC4as_T4_v3'

@description('Most nodes the training cluster scales to (it scales to 0 when idle).')
@minValue(1)
param gpuMaxNodes int = 2

@description('Low-priority (spot) nodes: cheaper, may be preempted (the job then waits and resumes).')
param gpuLowPriority bool = false

@description('Nodes per training job (Azure ML instance_count).')
@minValue(1)
param nodesPerJob int = 1

@description('GPUs per node: processes per node.')
@minValue(1)
param gpusPerNode int = 1

@description('The training environment: an image in the workspace registry built from training/environment (docs/azure.md), e.g. "<acr>.azurecr.io/retrain-training:2.14.1-hvd0.28.1". Empty: Azure ML builds training/requirements.txt on its base image (DDP only: no Horovod).')
param trainingImage string = ''

@description('Client id of the Entra ID app registration for sign-in and app roles (docs/azure.md, "Who may do what"). Empty: function keys only.')
param authClientId string = ''

var token = toLower(uniqueString(subscription().id, resourceGroup().id, environmentName))
var tags = { 'azd-env-name': environmentName, application: 'retrain' }

module identities 'modules/identity.bicep' = {
  name: 'identities'
  params: { location: location, tags: tags, token: token }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: { location: location, tags: tags, token: token }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: { location: location, tags: tags, token: token }
}

module bus 'modules/servicebus.bicep' = {
  name: 'servicebus'
  params: { location: location, tags: tags, token: token }
}

module ml 'modules/ml.bicep' = {
  name: 'ml'
  params: {
    location: location
    tags: tags
    token: token
    appInsightsId: monitoring.outputs.appInsightsId
    clusterIdentityId: identities.outputs.clusterIdentityId
    dataAccountName: storage.outputs.dataAccountName
    gpuVmSize: gpuVmSize
    gpuMaxNodes: gpuMaxNodes
    gpuLowPriority: gpuLowPriority
  }
}

module app 'modules/functionapp.bicep' = {
  name: 'functionapp'
  params: {
    location: location
    tags: tags
    token: token
    appIdentityId: identities.outputs.appIdentityId
    appIdentityClientId: identities.outputs.appIdentityClientId
    clusterIdentityClientId: identities.outputs.clusterIdentityClientId
    appInsightsConnectionString: monitoring.outputs.appInsightsConnectionString
    hostAccountName: storage.outputs.hostAccountName
    dataAccountName: storage.outputs.dataAccountName
    serviceBusNamespace: bus.outputs.namespaceName
    requestsQueue: bus.outputs.requestsQueue
    eventsTopic: bus.outputs.eventsTopic
    workspaceName: ml.outputs.workspaceName
    workspaceId: ml.outputs.workspaceId
    computeName: ml.outputs.computeName
    modelName: modelName
    nodesPerJob: nodesPerJob
    gpusPerNode: gpusPerNode
    trainingImage: trainingImage
    authClientId: authClientId
  }
}

module roles 'modules/roles.bicep' = {
  name: 'roles'
  params: {
    appPrincipalId: identities.outputs.appPrincipalId
    clusterPrincipalId: identities.outputs.clusterPrincipalId
    hostAccountName: storage.outputs.hostAccountName
    dataAccountName: storage.outputs.dataAccountName
    serviceBusNamespace: bus.outputs.namespaceName
    requestsQueue: bus.outputs.requestsQueue
    eventsTopic: bus.outputs.eventsTopic
    workspaceName: ml.outputs.workspaceName
    registryName: ml.outputs.registryName
    appInsightsName: monitoring.outputs.appInsightsName
  }
}

output AZURE_LOCATION string = location
output AZURE_FUNCTION_APP_NAME string = app.outputs.functionAppName
output RETRAIN_DATA_ACCOUNT string = storage.outputs.dataAccountName
output RETRAIN_SERVICEBUS_NAMESPACE string = bus.outputs.namespaceName
output RETRAIN_WORKSPACE_NAME string = ml.outputs.workspaceName
output RETRAIN_REGISTRY_NAME string = ml.outputs.registryName
output RETRAIN_COMPUTE_NAME string = ml.outputs.computeName

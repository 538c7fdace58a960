// The Azure ML workspace (with its key vault, container registry and storage), the GPU cluster
// (min 0 nodes, a user-assigned identity, optional low priority) and the two datastores the jobs
// read: `images` and `retrain` over the data account's containers, credential-less, so a job
// reads them with the cluster's identity (Storage Blob Data Reader on each container).
param location string
param tags object
param token string
param appInsightsId string
param clusterIdentityId string
param dataAccountName string
param gpuVmSize string
param gpuMaxNodes int
param gpuLowPriority bool

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  // checkov:skip=CKV_AZURE_109: the workspace's key vault is reached by Azure ML over its public endpoint (no VNet in this template); RBAC only, no access policies.
  // checkov:skip=CKV_AZURE_189: public network access kept for the same reason as CKV_AZURE_109 (Azure ML reaches it; no VNet).
  name: 'kv-retrain-${take(token, 14)}'
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: { family: 'A', name: 'standard' }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    publicNetworkAccess: 'Enabled'
    networkAcls: { defaultAction: 'Allow', bypass: 'AzureServices' }
  }
}

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' = {
  // checkov:skip=CKV_AZURE_139: the cluster pulls the training image over the public endpoint (no VNet); pulls need AcrPull, admin user is off.
  // checkov:skip=CKV_AZURE_164: content trust (signed images) needs Premium; the image is built in this registry by az acr build.
  // checkov:skip=CKV_AZURE_165: geo-replication needs Premium; one region holds the cluster.
  // checkov:skip=CKV_AZURE_166: image quarantine needs the Premium tier; only az acr build pushes here.
  // checkov:skip=CKV_AZURE_167: retention of untagged manifests needs Premium; images are tagged by version.
  // checkov:skip=CKV_AZURE_233: zone redundancy needs Premium.
  // checkov:skip=CKV_AZURE_237: dedicated data endpoints need Premium.
  name: 'crretrain${take(token, 12)}'
  location: location
  tags: tags
  sku: { name: 'Standard' }
  properties: {
    adminUserEnabled: false
    anonymousPullEnabled: false
    publicNetworkAccess: 'Enabled'
  }
}

resource workspaceStorage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35: Azure ML and the cluster reach the workspace's own storage over its public endpoint (no VNet in this template).
  // checkov:skip=CKV_AZURE_59: public network access kept for the same reason as CKV_AZURE_35 (identity only, shared keys off).
  // checkov:skip=CKV_AZURE_206: ZRS; job outputs are re-created by running the job again.
  // checkov:skip=CKV_AZURE_33: no queues are used by retrain in this account.
// checkov:skip=CKV_AZURE_43: the name is a fixed lowercase prefix and 11 characters of uniqueString() (lowercase letters and digits): 22 characters, within the rules; checkov cannot evaluate the interpolation.
  name: 'stretrainml${take(token, 11)}'
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: { name: 'Standard_ZRS' }
  properties: {
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    publicNetworkAccess: 'Enabled'
    networkAcls: { defaultAction: 'Allow', bypass: 'AzureServices' }
    encryption: {
      requireInfrastructureEncryption: true
      keySource: 'Microsoft.Storage'
      services: { blob: { enabled: true }, file: { enabled: true } }
    }
  }
}

resource workspace 'Microsoft.MachineLearningServices/workspaces@2024-04-01' = {
  // checkov:skip=CKV_AZURE_144: public network access kept: the Function App submits jobs from outside a VNet; every call needs an Entra ID role on the workspace.
  // checkov:skip=CKV_AZURE_243: no private endpoint, for the same reason as CKV_AZURE_144 (a VNet-integrated variant is listed under "Not done" in docs/azure.md).
  name: 'mlw-retrain-${token}'
  location: location
  tags: tags
  sku: { name: 'Basic', tier: 'Basic' }
  identity: { type: 'SystemAssigned' }
  properties: {
    friendlyName: 'retrain'
    storageAccount: workspaceStorage.id
    keyVault: vault.id
    applicationInsights: appInsightsId
    containerRegistry: registry.id
    publicNetworkAccess: 'Enabled'
    v1LegacyMode: false
  }
}

resource cluster 'Microsoft.MachineLearningServices/workspaces/computes@2024-04-01' = {
  parent: workspace
  name: 'gpu-cluster'
  location: location
  tags: tags
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: { '${clusterIdentityId}': {} }
  }
  properties: {
    computeType: 'AmlCompute'
    disableLocalAuth: true
    properties: {
      vmSize: gpuVmSize
      vmPriority: gpuLowPriority ? 'LowPriority' : 'Dedicated'
      osType: 'Linux'
      remoteLoginPortPublicAccess: 'Disabled'
      scaleSettings: {
        minNodeCount: 0 // nothing runs, nothing is billed for nodes
        maxNodeCount: gpuMaxNodes
        nodeIdleTimeBeforeScaleDown: 'PT30M'
      }
    }
  }
}

resource imagesDatastore 'Microsoft.MachineLearningServices/workspaces/datastores@2024-04-01' = {
  parent: workspace
  name: 'images'
  properties: {
    datastoreType: 'AzureBlob'
    accountName: dataAccountName
    containerName: 'images'
    endpoint: environment().suffixes.storage
    protocol: 'https'
    credentials: { credentialsType: 'None' } // identity-based: the job's identity reads it
    description: 'retrain: training images, <model>/<label>/<file>'
  }
}

resource artifactsDatastore 'Microsoft.MachineLearningServices/workspaces/datastores@2024-04-01' = {
  parent: workspace
  name: 'retrain'
  properties: {
    datastoreType: 'AzureBlob'
    accountName: dataAccountName
    containerName: 'retrain'
    endpoint: environment().suffixes.storage
    protocol: 'https'
    credentials: { credentialsType: 'None' }
    description: 'retrain: frozen manifests and champion checkpoints'
  }
}

output workspaceName string = workspace.name
output workspaceId string = workspace.id
output registryName string = registry.name
output computeName string = cluster.name

// Two storage accounts, both without shared keys (identity only):
// - data: container `images` (<model>/<label>/<file>, BlobCreated events), container `retrain`
//   (manifests, champion checkpoints, events over 256 KB) and table `retrain` (the ledger);
// - host: the Functions host's own storage (timers' leases) and the deployment package container.
param location string
param tags object
param token string

var common = {
  kind: 'StorageV2'
  sku: { name: 'Standard_ZRS' }
}

resource data 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35: public endpoint kept (Flex Consumption without VNet integration and the GPU cluster reach it); access needs an identity with a data role, shared keys are off. Private endpoints: docs/azure.md, "Not done".
  // checkov:skip=CKV_AZURE_59: public network access kept for the same reason as CKV_AZURE_35 (identity only, shared keys off). the public endpoint stays, anonymous and key access do not.
  // checkov:skip=CKV_AZURE_206: zone-redundant (ZRS) is the replication chosen; the ledger is rebuilt from the images if a region is lost.
  // checkov:skip=CKV_AZURE_33: queue service logging: no queues are used in this account.
  // checkov:skip=CKV_AZURE_43: the name is a fixed lowercase prefix and 10 characters of uniqueString() (lowercase letters and digits): 23 characters, within the rules; checkov cannot evaluate the interpolation.
  name: 'stretraindata${take(token, 10)}'
  location: location
  tags: tags
  kind: common.kind
  sku: common.sku
  properties: {
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    publicNetworkAccess: 'Enabled'
    networkAcls: { defaultAction: 'Allow', bypass: 'AzureServices' }
    encryption: {
      requireInfrastructureEncryption: true
      keySource: 'Microsoft.Storage'
      services: { blob: { enabled: true }, table: { enabled: true, keyType: 'Account' } }
    }
  }
}

resource dataBlobs 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: data
  name: 'default'
  properties: {
    deleteRetentionPolicy: { enabled: true, days: 7 }
    containerDeleteRetentionPolicy: { enabled: true, days: 7 }
  }
}

resource images 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: dataBlobs
  name: 'images'
  properties: { publicAccess: 'None' }
}

resource artifacts 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: dataBlobs
  name: 'retrain'
  properties: { publicAccess: 'None' }
}

resource dataTables 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: data
  name: 'default'
}

resource ledger 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = {
  parent: dataTables
  name: 'retrain'
}

resource host 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35: the Functions host reaches it over its public endpoint (no VNet integration); identity only, shared keys off.
  // checkov:skip=CKV_AZURE_59: public network access kept for the same reason as CKV_AZURE_35 (identity only, shared keys off).
  // checkov:skip=CKV_AZURE_206: ZRS; the host's storage holds only leases and the deployment package (redeployable).
  // checkov:skip=CKV_AZURE_33: the host's queues are the runtime's own bookkeeping; their logging adds cost and no signal here.
// checkov:skip=CKV_AZURE_43: the name is a fixed lowercase prefix and 10 characters of uniqueString() (lowercase letters and digits): 23 characters, within the rules; checkov cannot evaluate the interpolation.
  name: 'stretrainhost${take(token, 10)}'
  location: location
  tags: tags
  kind: common.kind
  sku: common.sku
  properties: {
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    publicNetworkAccess: 'Enabled'
    networkAcls: { defaultAction: 'Allow', bypass: 'AzureServices' }
    encryption: {
      requireInfrastructureEncryption: true
      keySource: 'Microsoft.Storage'
      services: { blob: { enabled: true } }
    }
  }
}

resource hostBlobs 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: host
  name: 'default'
}

resource deployments 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: hostBlobs
  name: 'app-package'
  properties: { publicAccess: 'None' }
}

output dataAccountName string = data.name
output hostAccountName string = host.name
output imagesContainer string = images.name
output artifactsContainer string = artifacts.name
output ledgerTable string = ledger.name
output deploymentContainer string = deployments.name

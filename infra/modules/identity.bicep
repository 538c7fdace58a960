// Two user-assigned identities: the Function App's (the worker) and the training cluster's (the jobs).
// User-assigned, so their role assignments exist before the app and the cluster that use them.
param location string
param tags object
param token string

resource app 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-retrain-app-${token}'
  location: location
  tags: tags
}

resource cluster 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-retrain-cluster-${token}'
  location: location
  tags: tags
}

output appIdentityId string = app.id
output appIdentityClientId string = app.properties.clientId
output appPrincipalId string = app.properties.principalId
output clusterIdentityId string = cluster.id
output clusterIdentityClientId string = cluster.properties.clientId
output clusterPrincipalId string = cluster.properties.principalId

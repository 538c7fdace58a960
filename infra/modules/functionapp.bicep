// The worker: a Function App on the Flex Consumption plan (Python 3.11), its user-assigned identity
// for every connection (no keys, no connection strings), Application Insights by Entra ID.
// Every app setting the code reads is here; tests/unit/test_infra.py checks it against the code.
param location string
param tags object
param token string
param appIdentityId string
param appIdentityClientId string
param clusterIdentityClientId string
param appInsightsConnectionString string
param hostAccountName string
param dataAccountName string
param serviceBusNamespace string
param requestsQueue string
param eventsTopic string
param workspaceName string
param workspaceId string
param computeName string
param modelName string
param nodesPerJob int
param gpusPerNode int
param trainingImage string
@description('Client id of the Entra ID app registration with the app roles Retrain.Reader/Requester/Operator (docs/azure.md); empty: function keys only.')
param authClientId string = ''

var blobSuffix = environment().suffixes.storage

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225: Flex Consumption places and replaces instances itself; zone redundancy for FC1 is not available in every region, so it is left to the deployer.
  name: 'plan-retrain-${token}'
  location: location
  tags: tags
  kind: 'functionapp'
  sku: { name: 'FC1', tier: 'FlexConsumption' }
  properties: { reserved: true }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_221: public network access kept: Event Grid and Service Bus deliver to it and callers use HTTP (function keys, or Entra ID with App Service Authentication: docs/azure.md).
  // checkov:skip=CKV_AZURE_222: as CKV_AZURE_221 (the same setting, checked as a web app).
  // checkov:skip=CKV_AZURE_17: Event Grid and Service Bus cannot present client certificates; callers authenticate with function keys or Entra ID instead.
  // checkov:skip=CKV_AZURE_212: Flex Consumption scales to zero when idle (the timer and the triggers wake it); a minimum instance count would bill around the clock.
  // checkov:skip=CKV_AZURE_213: the App Service health check does not apply to a Function App on Flex Consumption; the host's own health is in Application Insights.
  // checkov:skip=CKV_AZURE_56: App Service Authentication is configured per deployment (an app registration is needed first: docs/azure.md); the HTTP functions require a function key meanwhile.
  name: 'func-retrain-${token}'
  location: location
  tags: union(tags, { 'azd-service-name': 'worker' })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: { '${appIdentityId}': {} }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    publicNetworkAccess: 'Enabled'
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: 'https://${hostAccountName}.blob.${blobSuffix}/app-package'
          authentication: { type: 'UserAssignedIdentity', userAssignedIdentityResourceId: appIdentityId }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: 40
        instanceMemoryMB: 4096 // completions may export ONNX when a run did not
      }
      runtime: { name: 'python', version: '3.11' }
    }
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      appSettings: [
        // The Functions host's own storage, by identity.
        { name: 'AzureWebJobsStorage__accountName', value: hostAccountName }
        { name: 'AzureWebJobsStorage__credential', value: 'managedidentity' }
        { name: 'AzureWebJobsStorage__clientId', value: appIdentityClientId }
        // Telemetry with the identity (local auth is off on the component).
        { name: 'APPLICATIONINSIGHTS_CONNECTION_STRING', value: appInsightsConnectionString }
        { name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING', value: 'ClientId=${appIdentityClientId};Authorization=AAD' }
        // DefaultAzureCredential in the worker picks the user-assigned identity.
        { name: 'AZURE_CLIENT_ID', value: appIdentityClientId }
        // Images (backfills list them), artifacts and the ledger: identity-based endpoints.
        { name: 'RETRAIN_STORAGE__blobServiceUri', value: 'https://${dataAccountName}.blob.${blobSuffix}' }
        { name: 'RETRAIN_IMAGES_CONTAINER', value: 'images' }
        { name: 'RETRAIN_ARTIFACTS__blobServiceUri', value: 'https://${dataAccountName}.blob.${blobSuffix}' }
        { name: 'RETRAIN_ARTIFACTS_CONTAINER', value: 'retrain' }
        { name: 'RETRAIN_TABLES__tableServiceUri', value: 'https://${dataAccountName}.table.${blobSuffix}' }
        // Service Bus: the queue trigger's connection (with the identity) and the worker's client.
        { name: 'RETRAIN_SERVICEBUS__fullyQualifiedNamespace', value: '${serviceBusNamespace}.servicebus.windows.net' }
        { name: 'RETRAIN_SERVICEBUS__credential', value: 'managedidentity' }
        { name: 'RETRAIN_SERVICEBUS__clientId', value: appIdentityClientId }
        { name: 'RETRAIN_REQUESTS_QUEUE', value: requestsQueue }
        { name: 'RETRAIN_EVENTS_TOPIC', value: eventsTopic }
        // Who may call the HTTP functions: function keys until App Service Authentication (Entra ID) is
        // configured for the app; then 'entra' (app roles Retrain.Reader/Requester/Operator: docs/azure.md).
        { name: 'RETRAIN_AUTH', value: empty(authClientId) ? 'function_key' : 'entra' }
        // Model controls only from verified operators (HTTP with Retrain.Operator, or the CLI), not from the requests queue.
        { name: 'RETRAIN_QUEUE_CONTROLS', value: 'false' }
        // Only this workspace's run events are applied.
        { name: 'RETRAIN_AML_WORKSPACE_TOPIC', value: workspaceId }
        // The worker's configuration (RETRAIN__<SECTION>__<KEY>).
        { name: 'RETRAIN__WORKER__BACKEND', value: 'azureml' }
        { name: 'RETRAIN__WORKER__STORE', value: 'table' }
        { name: 'RETRAIN__WORKER__STATE_DIR', value: '/tmp/retrain' }
        { name: 'RETRAIN__AZUREML__SDK', value: 'v2' }
        { name: 'RETRAIN__AZUREML__SUBSCRIPTION_ID', value: subscription().subscriptionId }
        { name: 'RETRAIN__AZUREML__RESOURCE_GROUP', value: resourceGroup().name }
        { name: 'RETRAIN__AZUREML__WORKSPACE_NAME', value: workspaceName }
        { name: 'RETRAIN__AZUREML__AUTH', value: 'managed_identity' }
        { name: 'RETRAIN__AZUREML__CLIENT_ID', value: appIdentityClientId }
        { name: 'RETRAIN__AZUREML__COMPUTE_TARGET', value: computeName }
        { name: 'RETRAIN__AZUREML__CREATE_COMPUTE', value: 'false' } // the cluster is created here; the app may not create compute
        { name: 'RETRAIN__AZUREML__NODE_COUNT', value: string(nodesPerJob) }
        { name: 'RETRAIN__AZUREML__GPUS_PER_NODE', value: string(gpusPerNode) }
        { name: 'RETRAIN__AZUREML__JOB_IDENTITY_CLIENT_ID', value: clusterIdentityClientId } // jobs read the credential-less datastores with the cluster's identity
        { name: 'RETRAIN__AZUREML__TRAINING_IMAGE', value: trainingImage }
        { name: 'RETRAIN_MODELS', value: modelName } // the models this environment configures (RETRAIN__MODELS__<NAME>__... may only name these)
        { name: 'RETRAIN__MODELS__${toUpper(replace(modelName, '-', '_'))}__MIN_NEW_IMAGES', value: '200' }
      ]
    }
  }
}

// App Service Authentication with Entra ID: every HTTP call signs in; the platform passes the
// principal (with its app roles) to the app in X-MS-CLIENT-PRINCIPAL. Event Grid delivers through the
// runtime's own webhook path, which stays reachable (it has its system key).
resource authSettings 'Microsoft.Web/sites/config@2024-04-01' = if (!empty(authClientId)) {
  // checkov reads every sites/config resource as the site's general config; these checks are about other settings:
  // checkov:skip=CKV_AZURE_13: this resource is App Service Authentication (authsettingsV2, platform.enabled); the check reads the older authsettings schema.
  // checkov:skip=CKV_AZURE_222: public network access is a property of the site, skipped there with its reason; this resource has none.
  // checkov:skip=CKV_AZURE_63: HTTP logging is a logs-config setting; a Function App's logs go to Application Insights.
  // checkov:skip=CKV_AZURE_65: detailed error pages are a logs-config setting of web apps; functions answer JSON errors themselves.
  // checkov:skip=CKV_AZURE_66: failed request tracing is a logs-config setting of web apps; requests are traced in Application Insights.
  // checkov:skip=CKV_AZURE_80: a Python app: no .NET Framework version applies.
  // checkov:skip=CKV_AZURE_88: Flex Consumption deploys from a blob container with the identity; no Azure Files content share is used.
  parent: site
  name: 'authsettingsV2'
  properties: {
    platform: { enabled: true }
    globalValidation: {
      requireAuthentication: true
      unauthenticatedClientAction: 'Return401'
      excludedPaths: ['/runtime/webhooks/eventgrid']
    }
    identityProviders: {
      azureActiveDirectory: {
        enabled: true
        registration: {
          clientId: authClientId
          openIdIssuer: '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'
        }
        validation: { allowedAudiences: ['api://${authClientId}', authClientId] }
      }
    }
    login: { tokenStore: { enabled: false } }
  }
}

output functionAppName string = site.name
output functionAppId string = site.id

// Log Analytics and Application Insights (the worker's OpenTelemetry and the Functions host's logs).
// Local authentication is off: telemetry is sent with the app's identity (Monitoring Metrics Publisher).
param location string
param tags object
param token string

resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: 'log-retrain-${token}'
  location: location
  tags: tags
  properties: {
    sku: { name: 'PerGB2018' }
    retentionInDays: 30
  }
}

resource insights 'Microsoft.Insights/components@2020-02-02' = {
  name: 'appi-retrain-${token}'
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logs.id
    DisableLocalAuth: true
  }
}

output appInsightsId string = insights.id
output appInsightsName string = insights.name
output appInsightsConnectionString string = insights.properties.ConnectionString

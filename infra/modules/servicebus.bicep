// Service Bus: the requests queue (duplicate detection, dead-letter queue) and the events topic
// (duplicate detection: the outbox relay sends each event with its id as the message id).
// Local (SAS) authentication is off: senders and receivers need a data role on the entity.
param location string
param tags object
param token string

resource namespace 'Microsoft.ServiceBus/namespaces@2021-11-01' = {
  // checkov:skip=CKV_AZURE_199: double encryption needs the Premium tier; Standard's service-managed encryption is used.
  // checkov:skip=CKV_AZURE_201: customer-managed keys need the Premium tier.
  // checkov:skip=CKV_AZURE_203: public endpoint kept (upstream senders and the Function App outside a VNet); SAS is disabled, callers need Entra ID roles.
  name: 'sb-retrain-${token}'
  location: location
  tags: tags
  sku: { name: 'Standard', tier: 'Standard' }
  identity: { type: 'SystemAssigned' }
  properties: {
    disableLocalAuth: true
    minimumTlsVersion: '1.2'
    publicNetworkAccess: 'Enabled'
  }
}

resource requests 'Microsoft.ServiceBus/namespaces/queues@2021-11-01' = {
  parent: namespace
  name: 'retrain-requests'
  properties: {
    requiresDuplicateDetection: true
    duplicateDetectionHistoryTimeWindow: 'P7D' // the longest: a redelivered request is dropped by the broker, then by the ledger's inbox (8 days)
    maxDeliveryCount: 10
    deadLetteringOnMessageExpiration: true
    lockDuration: 'PT5M'
    defaultMessageTimeToLive: 'P14D'
  }
}

resource events 'Microsoft.ServiceBus/namespaces/topics@2021-11-01' = {
  parent: namespace
  name: 'retrain-events'
  properties: {
    requiresDuplicateDetection: true
    duplicateDetectionHistoryTimeWindow: 'P1D'
    defaultMessageTimeToLive: 'P14D'
  }
}

output namespaceName string = namespace.name
output requestsQueue string = requests.name
output eventsTopic string = events.name

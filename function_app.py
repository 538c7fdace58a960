"""Azure Functions entry point: creates the app and registers one blueprint per trigger module.

Nothing else lives here: the Functions host imports this module to index the functions, so it
must stay cheap (no torch, no azureml, no connections). The trigger blueprints arrive with the
Functions issue; until then the app has no functions.
"""

import azure.functions as func

app = func.FunctionApp()

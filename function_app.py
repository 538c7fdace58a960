"""Azure Functions entry point: creates the app and registers one blueprint per trigger module.

Nothing else lives here: the Functions host imports this module to index the functions, so it
must stay cheap (no torch, no azureml, no connections; the worker is built on first use).
"""

import azure.functions as func

from functions import blob_images, eventgrid_runs, http_api, servicebus_requests, timer_tick

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
for module in (blob_images, servicebus_requests, http_api, eventgrid_runs, timer_tick):
    app.register_functions(module.bp)

"""The controller service: Legion's agents behind a gRPC API (``legion serve``).

    from legion.server import ControllerServer, ServerSettings, TokenTable

    tokens = TokenTable.load("tokens.toml")
    settings = ServerSettings(listen="127.0.0.1:50051", authenticator=tokens)
    async with ControllerServer({"Accountant": Accountant}, settings) as server:
        await server.wait_stopped()

The API is ``protos/legion/controller/v1/controller.proto``; :class:`legion.Client`
speaks it from Python.
"""

from .app import ControllerServer, ServerSettings, check_listen, load_registry, serve
from .auth import LOCAL, Authenticator, AuthInterceptor, Principal, TokenTable, current_principal
from .service import CLIENT_CONFIG_KEYS, SERVICE_NAME, ControllerService

__all__ = [
    "CLIENT_CONFIG_KEYS",
    "LOCAL",
    "SERVICE_NAME",
    "AuthInterceptor",
    "Authenticator",
    "ControllerServer",
    "ControllerService",
    "Principal",
    "ServerSettings",
    "TokenTable",
    "check_listen",
    "current_principal",
    "load_registry",
    "serve",
]

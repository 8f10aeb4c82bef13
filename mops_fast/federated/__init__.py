"""Federated MoPs: non-i.i.d. partitions, transport-independent client and server logic, the in-process
simulation (default) and Flower apps (flower_app.py, imported only when used: it needs `flwr`).

    from mops_fast.federated import federate, load_federated_config
    results = federate(load_federated_config("configs/dolly_federated.yaml"))
"""
from mops_fast.federated.client import ClientUpdate, LocalClient
from mops_fast.federated.config import FedConfig, load_federated_config, validate_config
from mops_fast.federated.context import FedContext
from mops_fast.federated.partition import PartitionConfig, partition
from mops_fast.federated.server import FederatedServer, validate_update
from mops_fast.federated.simulation import FederatedRun, InProcessDispatcher
from mops_fast.federated.strategies import ServerOptimizer, StrategyConfig

__all__ = ["ClientUpdate", "LocalClient", "FedConfig", "load_federated_config", "validate_config", "FedContext",
           "PartitionConfig", "partition", "federate", "FederatedServer", "validate_update", "FederatedRun",
           "InProcessDispatcher", "ServerOptimizer", "StrategyConfig"]


def __getattr__(name):
    # run.py is also a script (`python -m mops_fast.federated.run`): imported lazily so that running it
    # does not import it twice
    if name == "federate":
        from mops_fast.federated.run import federate

        return federate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

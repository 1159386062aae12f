"""The worker host: ``zmqexecutor worker``, a supervisor process and its task processes.

The supervisor (``_supervisor``: lifecycle, signals, drain) owns the front socket (``_front``) and
routes tasks between clients and task processes (``_router``, with each client's ``_sessions``); the
``_relay`` decides which process runs which task (and, direct, leaves that to the client); the
``_taskpool`` starts, reaps and replaces the task processes, each of which runs ``_taskprocess``, the only
place user code runs on a worker. ``_cpus`` counts the CPUs a worker may use. Imports ``_wire``,
never ``_client``.
"""

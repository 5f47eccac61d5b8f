"""The parallel machinery: the communicator (``comm``), gradient synchronisation (``sync``: the
overlapped ``data_parallel`` reduction and the bitwise ``deterministic`` one), pipeline stages
(``pipeline``), agreed stops on signals (``preempt``), the stall ``inspector``, and the ``probe``
through which step timers, ``timeline`` spans, inspector marks and ``faults`` see a step.
"""

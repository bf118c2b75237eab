"""Capture: the hooks of a trace and what they see (first layer of the flow).

``recorder`` installs and removes every hook and writes parts into the ledger; ``intercept`` is the
TorchFunctionMode that sees backward calls, ``.grad`` reads and in-place writes; ``calls`` reads a
backward call's arguments; ``graph`` walks autograd graphs; ``targets`` and ``checkpoint`` find the
leaves to record; ``sites`` finds the user's line; ``transforms`` handles torch.func / torch.compile;
``host`` is the plugin host every event goes through. Imports nothing above ``ledger``.
"""

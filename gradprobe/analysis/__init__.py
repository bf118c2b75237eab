"""Analysis: numbers derived from the ledger (third layer of the flow).

``finals`` snapshots each leaf's ``.grad`` at the end; ``breakdown`` turns the ledger's parts into
per-leaf rows with shares and checks; ``split`` / ``split_sources`` are per-loss splits grouped by
module; ``decompose`` / ``decompose_plugin`` / ``losses`` split one backward of a combined loss into
per-loss parts. Reads capture and ledger; never imports detectors, reports or the Trace.
"""

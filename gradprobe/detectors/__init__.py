"""Built-in mistake detectors, one per module, each registered as a gradprobe plugin."""

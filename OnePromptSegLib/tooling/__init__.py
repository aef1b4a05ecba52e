"""Developers' tooling: training (``train``), synthetic training volumes (``synth``), the benchmark (``bench``),
calibration (``calibrate``) and the ``onepromptseg-dev`` command (``cli``).

It may import the runtime (``OnePromptSegLib``); the runtime never imports it, and the Slicer extension does not
install it (Testing/test_architecture.py checks both).
"""

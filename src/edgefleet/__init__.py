"""edgefleet: run quantized TFLite and ONNX models on edge devices and keep a fleet up to date.

The package is layered; each layer imports only the ones below it:

* ``edgefleet.cli`` - the ``edgefleet`` command.
* ``edgefleet.server`` (``fleet-server/``) and ``edgefleet.converters`` (``converters/``).
* ``edgefleet.agent`` (``agent/``) - what runs on the device.
* the shared core: ``edgefleet.bundle`` (the ``.efb`` format), ``edgefleet.stats`` (drift statistics),
  ``edgefleet.errors``, ``edgefleet.durable`` (atomic writes).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

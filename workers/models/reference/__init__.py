"""The bundled reference model `ct-head-hyperdensity`, trained here on synthetic head CT phantoms.

`phantom` makes the synthetic studies (and writes them as DICOM), `network` holds the network and
its fixed pre- and post-processing, `train` and `evaluate` produce and measure the shipped weights.
"""

"""The device runtime: ``lthmaml-device`` adapts an ONNX artifact to a task folder and predicts, with
onnxruntime, numpy and Pillow only (``pip install lthmaml[device]``): no torch, no Lightning.

It reads the task folder as ``lthmaml-edge`` does (:mod:`lthmaml.data.taskfiles`), decodes images
with the one implementation meta-training used (:mod:`lthmaml.data.decode`), checks the artifact's
checksums (:mod:`lthmaml.edge.onnx_format`) and writes the same ``predictions.csv``
(:mod:`lthmaml.edge.predictions`). Nothing here may import torch, Lightning or training code.
"""

"""What models are and what they cost: the catalog of both zoos (torchvision, timm), weights (pull, import,
load), cost traces on the meta device, and the ONNX helpers that export and quantize a model."""

"""Image classification: ImageFolder / timm data, timm models, top-1/top-5 evaluation, prediction and export."""

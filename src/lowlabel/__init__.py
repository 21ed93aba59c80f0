"""lowlabel: brain-tissue segmentation under label budgets, pretraining and transfer."""

__version__ = "0.1.0"

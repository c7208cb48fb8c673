"""rgchat: chat with RecurrentGemma on your own machine, in constant memory."""

__version__ = "0.1.0"

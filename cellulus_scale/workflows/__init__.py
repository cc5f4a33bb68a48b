"""The public workflows that tie the layers together: predict and the demo."""

"""Linear attention family: feature maps, gated recurrences and the delta rule."""

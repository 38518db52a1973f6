"""Tools around the engine: the demo and its assets, the scaling study and its plot."""

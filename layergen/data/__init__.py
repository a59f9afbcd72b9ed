"""Procedural data: layered 2D scenes, layered 3D mannequins, articulated action figures."""

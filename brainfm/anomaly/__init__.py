"""Pseudo-healthy reconstruction and deviation maps."""

"""Preference collection: comparisons of a policy's own answers, labelled by an annotator."""

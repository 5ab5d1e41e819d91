"""Step kinds: the handlers that run one attempt of a step, and the registry that names them."""

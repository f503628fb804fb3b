"""One module per paper: a state class and its hook. The catalog (``ddp_hooks.catalog``)
imports and exports them."""

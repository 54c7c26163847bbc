"""The stages that rows pass through, as Ray Data UDFs (small callable classes) that know nothing of the executor
that runs them."""

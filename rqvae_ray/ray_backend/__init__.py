"""The Ray executor: the only package that imports ``ray`` (cluster, datasource, pool plan, writer actor, executor,
and the Ray APIs that change between versions)."""

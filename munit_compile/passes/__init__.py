"""munit's graph passes: each is `GraphModule -> GraphModule` (or annotates `node.meta`)."""

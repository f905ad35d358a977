"""One module per group of CLI commands; `jfexport.cli` registers them."""

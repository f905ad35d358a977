"""Model-free code shared by the reference, the exporter and the runtime: no torch model code here."""

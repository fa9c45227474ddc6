"""Multi-modal inputs: parsing (inputs.py), the model's own processor behind an adapter
(processing.py, processors/), the processed-input cache (cache.py) and the registry of which
architecture takes which modalities (registry.py)."""

"""Building blocks every model family shares: tensor-parallel linears that split themselves, the one attention
function, the multiway step, Sub-LN over split features, and how a module maps to its published tensors."""

"""The ground floor: what every other part of rankcut stands on and nothing in it imports from
above. Errors, atomic files, the machine, the factored layers and their saved records, target
selection, rank arithmetic, module helpers, storage layouts and the record rankcut keeps on a
model."""

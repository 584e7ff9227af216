"""Feature data: the host-memory feature store and its sampler, synthetic datasets, and the readers
of the Collaborative Experts / TeachText feature releases (layouts, restricted unpickling)."""

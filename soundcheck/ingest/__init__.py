"""Stage 1: input contracts (:mod:`.contracts`) and partial aggregates (:mod:`.partials`)."""

"""Stage 4, projections: the sparse student -> teacher matrix W (`builder`, with the row rules in
`rules` and the corpus refinement in `refine`), written and read as artifacts (`artifacts`)."""

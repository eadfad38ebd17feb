"""Text and benchmark data as files: the gensim texts that ship with the wheel, the benchmark
sets in the shared data folder (or on the hub), and GLUE's TSV files. Readers only: nothing
here touches a model."""

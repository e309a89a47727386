"""Token data pipeline: tokenize corpora into webdataset shards, stream them deterministically,
resume exactly.

Stages (one module each):

* ``tokenizers`` - byte tokenizer (pad=0, bos=1, eos=2, mask=3, byte b -> b+4) and local HF tokenizers
* ``corpus``     - reading .txt / .jsonl / .parquet inputs (files, directories, globs)
* ``tokenize``   - the ``twotower-tokenize`` CLI: documents -> packed seq_len samples -> shards + manifest
* ``shards``     - shard writing (atomic, with offset index), manifest, sample decoding / validation
* ``stream``     - seekable per-slot sample streams (epoch split, block shuffle, blend draws)
* ``plan``       - what the workers read: manifests checked against the config, shard lists, the decoder
* ``loader``     - ``TokenLoader``: torch DataLoader workers, batches, ``state_dict`` / ``load_state_dict``
* ``workers``    - helper-process policy: workers drop others' SIGTERM / SIGUSR1 and die with their parent
* ``config``     - ``DataConfig`` (the ``conf/data/*.yaml`` schema)
* ``synthetic``  - a small learnable demo corpus

Training loop entry points: ``build_train_loader``, ``build_valid_loader``, ``DataConfig``.
"""

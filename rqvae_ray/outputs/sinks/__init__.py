"""One model's output file, by concern: the file format (:mod:`.formats`), the row spool (:mod:`.spool`), the cap
spool (:mod:`.cap`), the resume journal (:mod:`.journal`) and the rows kept from an existing file (:mod:`.kept`), put
together by :class:`~rqvae_ray.outputs.sinks.model_sink.ModelSink`."""

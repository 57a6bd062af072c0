"""In-process trainers of the artifacts the platform ships: the VQ tokenizer (``tokenizer``) and
TokenAdapt (``tokenadapt``). Models on tokens train on Ray Train instead (``tokray.train``)."""

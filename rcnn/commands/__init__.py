"""The subcommands of `rcnn` beyond running one stage; `cli.py` adds them to its group."""

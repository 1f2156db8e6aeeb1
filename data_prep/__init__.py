"""Dataset preparation for dwnet-ds: ImageFolder trees -> ffcv .beton files (`python -m data_prep --help`)."""

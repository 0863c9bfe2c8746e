"""Lifted transforms: JAX transforms over refax objects, sharing one lifting core (_lift.py)."""

"""The feature file (`features`): the only module that knows the HDF5 layout and imports h5py.
"""

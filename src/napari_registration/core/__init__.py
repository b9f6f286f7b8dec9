"""Pure computation: numpy/scipy, with OpenCV and SimpleITK imported only when used.
Never imports napari or Qt."""

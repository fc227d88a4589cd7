"""Finding faces in photos (MTCNN, OpenCV's Haar cascades) and the crop framing a model was trained on."""
